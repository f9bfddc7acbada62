# cmake --install: header, both libraries, kvrtConfig.cmake (find_package(kvrt)) and kvrt.pc.
include(CMakePackageConfigHelpers)
install(TARGETS kvrt kvrt_static EXPORT kvrtTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  PUBLIC_HEADER DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${PROJECT_SOURCE_DIR}/api/include/kvrt.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT kvrtTargets NAMESPACE kvrt:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvrt)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/kvrtConfig.cmake.in
  ${PROJECT_BINARY_DIR}/kvrtConfig.cmake INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvrt)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/kvrtConfigVersion.cmake
  COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/kvrtConfig.cmake ${PROJECT_BINARY_DIR}/kvrtConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/kvrt)
configure_file(${PROJECT_SOURCE_DIR}/cmake/kvrt.pc.in ${PROJECT_BINARY_DIR}/kvrt.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/kvrt.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
